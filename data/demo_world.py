"""The text of the demo "assistant world" (data/demo.py): topics, facts, prompt and reply templates.

Chinese is written once in Simplified characters; Traditional text is derived with the character map `S2T` below
(checked against OpenCC's s2t phrase conversion when the tables were written: every sentence here converts the same
character by character, so no phrase-level ambiguity such as 发 -> 發/髮 occurs). Keep it that way when editing:
avoid characters with several Traditional forms (发 面 干 只 里 后 台 着 ...).

Each topic has one keyword per language; the keyword is how `data.demo.true_reward` tells which topic a prompt asks
about and whether a reply answers it, so no keyword may occur inside another topic's prompt text or keyword.
"""

from __future__ import annotations

# key | zh keyword | en keyword, then 3 zh facts, then 3 en facts (one per line). Facts avoid other topics' keywords.
_TABLE = """
weather|天气|weather
出门前看一眼预报，就知道要不要带伞。|春天的早晚温差大，记得加一件外套。|晴朗的日子适合晒被子。
Check the forecast before you go out so you know if you need an umbrella.
Spring mornings can be cold, so bring a light jacket.
A sunny day is good for drying clothes outside.
cooking|做饭|cooking
先把材料都切好，再开火，会轻松很多。|少放盐，多用葱姜，味道也很好。|炒青菜要大火快炒。
Cut everything before you turn on the stove.
Use less salt and more herbs for a lighter taste.
Cook greens fast on high heat.
numbers|数字|numbers
七是一个很多人喜欢的数。|把很长的号码分成小段，更容易记住。|零是最小的自然数。
Seven is a number many people like.
Split a long phone code into small groups to remember it.
Zero is the smallest natural number.
colours|颜色|colours
蓝色和绿色让人觉得安静。|红色常常代表热情。|把黄色和蓝色混在一起会得到绿色。
Blue and green feel calm to most people.
Red often stands for energy.
Mix yellow and blue and you get green.
animals|动物|animals
大象是陆地上最大的哺乳类之一。|很多鸟会在秋天飞到南方。|海豚很聪明，会互相交流。
Elephants are among the largest land mammals.
Many birds fly south in autumn.
Dolphins are smart and talk to each other.
travel|旅行|travel
出发前列一张清单，就不容易忘带东西。|提前订票通常更便宜。|带一个充电宝会方便很多。
Make a list before you leave so you do not forget things.
Booking early is often cheaper.
A small power bank makes trips easier.
music|音乐|music
每天听一会儿轻柔的歌可以放松心情。|学乐器最重要的是坚持练习。|唱歌前先做几次深呼吸。
A few calm songs each day can help you relax.
The key to learning an instrument is daily practice.
Take a few deep breaths before you sing.
reading|读书|reading
每天读二十页，一年能读完不少好书。|睡前翻翻纸质书比看屏幕更放松。|读完一章可以写一句话总结。
Twenty pages a day adds up to many books in a year.
A paper book before bed is more relaxing than a screen.
Write one line to sum up each chapter.
sports|运动|sports
开始前先热身可以减少受伤。|每周锻炼三次对身体很好。|打完球要记得喝水。
Warm up first to avoid getting hurt.
Training three times a week is good for you.
Drink water after you play.
sleep|睡眠|sleep
固定的作息能让人休息得更好。|睡前一小时放下屏幕。|卧室安静一点，更容易入睡。
A fixed bedtime helps you rest better.
Put the screen away an hour before bed.
A quiet, dark room makes it easier to drift off.
coffee|咖啡|coffee
下午三点以后少喝一点，晚上更好入睡。|新鲜的豆子磨出来更香。|加一点牛奶，口感更柔和。
Skip it after three in the afternoon to rest well at night.
Fresh beans ground just before brewing smell better.
A little milk makes the taste softer.
gardening|园艺|gardening
大多数植物喜欢早上浇水。|先从好养的薄荷开始种。|落叶可以做成很好的肥料。
Most plants like to be watered in the morning.
Start with easy plants such as mint.
Fallen leaves make good compost.
computers|电脑|computers
定期备份文件，机器坏了也不怕。|关掉不用的程序，运行会更快。|每隔一小时让眼睛休息一下。
Back up your files often in case something breaks.
Close programs you do not use to keep things fast.
Rest your eyes every hour at the screen.
phones|手机|phones
晚上把亮度调低，眼睛更舒服。|关掉不需要的通知，能更专心。|设一个密码会更安全。
Turn down the brightness at night to rest your eyes.
Turn off alerts you do not need to stay focused.
Set a lock code to keep your data safe.
movies|电影|movies
周末看一部老片子是很好的放松方式。|看片时关掉灯，感觉更像影院。|喜剧片适合和家人一起看。
An old film on the weekend is a nice way to relax.
Turn off the lights for a real cinema feeling.
Comedies are great to watch with family.
running|跑步|running
刚开始可以跑走结合。|一双合适的鞋很重要。|跑完后拉伸五分钟。
Start by mixing short runs with walking.
Good shoes matter a lot.
Stretch for five minutes after each run.
swimming|游泳|swimming
先学会在水中放松。|这项活动对关节很友好。|下水前要做好热身。
First learn to relax in the water.
It is gentle on your joints.
Warm up before you get in the pool.
painting|绘画|painting
从简单的线条开始练习。|多观察光和影子的变化。|每天画十分钟也会进步。
Start by practising simple lines.
Watch how light and shadow change.
Ten minutes of drawing a day adds up.
history|历史|history
长城已经有两千多年了。|了解过去能帮我们看清现在。|去博物馆走一走会有很多收获。
The Great Wall is more than two thousand years old.
Knowing the past helps us understand today.
A museum visit can teach you a lot.
maths|数学|maths
多做练习是学好这门课的关键。|先理解概念，再背公式。|画图能让问题变简单。
Practice is the key to getting good at it.
Understand the idea before you learn the formula.
Drawing a picture often makes a problem simpler.
health|健康|health
多吃新鲜食物，少吃油炸的东西。|每天走路半小时对身体有益。|定期体检能及早发现问题。
Eat fresh food and less fried food.
A half-hour walk each day is good for you.
Regular checkups find problems early.
fruit|水果|fruit
苹果和香蕉是方便携带的零食。|当季的果子最新鲜。|吃之前记得先洗一洗。
Apples and bananas are easy snacks to carry.
Food in season tastes the freshest.
Wash it before you eat it.
vegetables|蔬菜|vegetables
深绿色的叶子营养很丰富。|蒸比煮能保留更多营养。|每餐多吃一些青菜是好习惯。
Dark green leaves are full of nutrients.
Steaming keeps more nutrients than boiling.
Filling half your plate with greens is a good habit.
studying|学习|studying
每学二十五分钟休息五分钟。|把知识讲给别人听，记得更牢。|安静的环境更容易专心。
Take a five-minute break after every twenty-five minutes.
Teaching someone else helps you remember.
A quiet place makes it easier to focus.
work|工作|work
先做最重要的一件事。|列一张待办清单能减少压力。|中午休息一下，下午效率更高。
Do the most important task first.
A to-do list lowers stress.
A short break at noon helps in the afternoon.
cities|城市|cities
坐地铁通常是出行最快的方法。|老街区往往最有味道。|公园让人们住得更舒服。
The subway is often the fastest way to get around.
Old neighbourhoods often have the most charm.
Parks make a place nicer to live in.
ocean|大海|ocean
海水是咸的，因为溶有很多盐。|去海边记得涂防晒。|退潮时可以在沙滩上找贝壳。
Sea water tastes salty because of dissolved salt.
Wear sunscreen at the beach.
At low tide you can look for shells on the sand.
stars|星星|stars
远离灯光才能看到更多。|北极星可以帮你辨认方向。|流星其实是燃烧的小石头。
Get away from bright lights to see more of them.
The North Star can help you find north.
A shooting star is really a small burning rock.
holidays|节日|holidays
春节是中国最重要的传统庆典。|中秋时大家会一起吃月饼。|放假前早点买票，可以少排队。
New Year is a big celebration in many places.
Many families share mooncakes at Mid-Autumn.
Buy tickets early before a busy season.
friends|朋友|friends
真正的好友会在困难时陪伴你。|常常聊天，感情才不会变淡。|认真倾听是最好的礼物。
Good pals stay with you in hard times.
Keep in touch so that bonds stay strong.
Listening well is the best gift.
"""


def _parse_topics(table: str) -> tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...]:
    lines = [line for line in table.strip().split("\n") if line]
    if len(lines) % 5:
        raise ValueError(f"data/demo_world.py: topic table has {len(lines)} lines, expected a multiple of 5")
    topics = []
    for i in range(0, len(lines), 5):
        key, zh_kw, en_kw = lines[i].split("|")
        topics.append((key, zh_kw, en_kw, tuple(lines[i + 1].split("|")), tuple(lines[i + 2 : i + 5])))
    return tuple(topics)


# (key, zh keyword (Simplified), en keyword, zh facts, en facts)
TOPICS = _parse_topics(_TABLE)

# User prompts, in-domain (SFT, PPO prompts, clean RM data, feedback). Every zh template has a character whose
# Simplified and Traditional forms differ (请/請, 吗/嗎, 么/麼 ...), so the prompt's script is always detectable.
ZH_PROMPTS = (
    "请告诉我一些关于{kw}的{aspect}。",
    "你能聊聊{kw}吗？",
    "我想了解{kw}，有什么{aspect}？",
    "关于{kw}，你有什么{aspect}吗？",
    "请用一句话介绍{kw}。",
    "{kw}方面有什么{aspect}？请简单说说。",
)
ZH_ASPECTS = ("建议", "小知识", "经验", "想法", "技巧", "常识")
EN_PROMPTS = (
    "Can you tell me {aspect} about {kw}?",
    "Please give me {aspect} on {kw}.",
    "What should I know about {kw}?",
    "I want to learn about {kw}. Do you have {aspect}?",
    "Say something short about {kw}, please.",
    "Do you have {aspect} about {kw}?",
)
EN_ASPECTS = ("a tip", "a fact", "some advice", "an idea", "a quick note", "a suggestion")
# The broader, shifted prompt style of the PMP comparisons (forum / search-box phrasing).
ZH_PMP_PROMPTS = ("问题：{kw}有什么要注意的？", "【{kw}】求{aspect}，谢谢！", "在线等：{kw}怎么办？", "说说你对{kw}的看法吧。")
EN_PMP_PROMPTS = ("Question: what matters most with {kw}?", "Quick one: thoughts on {kw}?",
                  "Hey, {kw} - any {aspect}?", "Help me with {kw} please.")
EN_PMP_ASPECTS = ("tips", "ideas", "advice", "pointers")
SYSTEM_PROMPTS = {
    "zh-Hans": "你是一个乐于助人的助手。",
    "en": "You are a helpful assistant.",
}

# Assistant replies: an opener naming the topic keyword, then one fact.
ZH_REPLIES = ("说到{kw}，{fact}", "关于{kw}：{fact}", "{kw}是个好话题。{fact}", "{fact}这是我对{kw}的一点建议。",
              "好的，我们聊聊{kw}。{fact}")
EN_REPLIES = ("About {kw}: {fact}", "Good question about {kw}. {fact}", "{fact} That is my note on {kw}.",
              "Sure, let's talk about {kw}. {fact}", "Here is something on {kw}. {fact}")
ZH_PMP_REPLIES = ("{kw}嘛，{fact}", "简单说，{kw}就是这样：{fact}", "{fact}（{kw}）")
EN_PMP_REPLIES = ("Re {kw}: {fact}", "In short, on {kw}: {fact}", "{fact} ({kw})")
# Padding that makes a reply too long (length penalty), other sign-offs (no closing bonus), content-free replies.
ZH_FILLERS = ("另外，每个人的情况都不一样，可以多试几次。", "如果还有问题，可以随时再问我。", "我会尽量把事情说得清楚一些。",
              "这些都是很常见的做法，你可以慢慢来。")
EN_FILLERS = ("Also, everyone is different, so feel free to try a few times.",
              "If you have more questions, you can always ask me again.", "I will try to keep things clear and simple.",
              "These are common habits, so take your time.")
ZH_SIGNOFFS = ("祝你愉快。", "加油！", "就这些。")
EN_SIGNOFFS = ("Have a nice day.", "Good luck!", "That is all.")
ZH_JUNK = ("不知道。", "嗯嗯，好的。", "这个问题我不太清楚。")
EN_JUNK = ("I don't know.", "Okay, sure.", "I am not sure about that.")
# Plain-text sentences for the pretraining stream.
ZH_GENERIC = ("{kw}是生活中常见的话题。", "很多人对{kw}很感兴趣。", "今天我们来聊聊{kw}。", "关于{kw}，大家的看法不太一样。")
EN_GENERIC = ("Many people are curious about {kw}.", "Today we talk about {kw}.",
              "People have different views on {kw}.",
              "There is a lot to say about {kw}.")

# Simplified -> Traditional (Taiwan standard, OpenCC s2tw) for every character of this file that differs; pairs of
# characters. 游 stays 游 (游泳), and 松/周/钟/获/炼 take their phrase forms here (放鬆, 週末, 分鐘, 收穫, 鍛鍊).
S2T = (
    "专專东東两兩个個丰豐为為么麼乐樂习習书書买買于於从從们們会會伞傘传傳伤傷体體倾傾儿兒关關兴興养養写寫况況减減几幾刚剛别別剧劇办辦动動区區单單卧臥历歷压壓双雙发發变變叶葉号號后後吗嗎听聽周週咸鹹园園国國"
    "图圖坏壞坚堅壳殼备備头頭学學宝寶实實对對尽盡带帶帮幫庆慶开開张張当當总總惯慣报報携攜数數时時晒曬机機条條来來松鬆极極样樣检檢欢歡气氣浇澆涂塗温溫滩灘灯燈点點炼鍊烧燒热熱环環现現电電画畫盐鹽码碼礼禮离離"
    "种種简簡类類红紅纸紙线線练練绍紹经經结結绘繪给給统統绿綠聪聰脑腦艺藝节節苹蘋获穫营營葱蔥蓝藍见見观觀觉覺订訂认認让讓议議记記讲講设設识識诉訴试試话話说說请請读讀课課调調谢謝贝貝质質轻輕边邊过過运運还還"
    "这這进進远遠适適钟鐘铁鐵键鍵锻鍛长長门門问問队隊陆陸随隨难難静靜页頁项項预預题題颜顏飞飛饭飯饼餅馆館验驗鲜鮮鸟鳥黄黃"
)
